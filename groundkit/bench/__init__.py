"""``groundkit bench ...``: the shared harness (:mod:`.common`), the metrics, concurrency and GPU benchmarks,
and each method's benchmark (:mod:`.wang21`, :mod:`.crosskd` with its baseline :mod:`.crosskd_official_like`,
:mod:`.cogrounding`, :mod:`.clipvg`). The library never imports this package: the command line loads a
benchmark lazily from its ``"module:function"`` string in a method's ``commands["bench"]``."""
