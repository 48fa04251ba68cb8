"""Readers and writers of the real data sets' file formats, shared by the methods and the built-in world.

``flickr30k_entities`` (Sentences / Annotations XML), ``refcoco`` (the refer API's ``refs(*).p`` and
``instances.json``), ``transvg`` (TransVG / CLIP-VG ``.pth`` split lists), ``vid_sentence``
(VID-Sentence tubes and lists), ``wang21_hdf5`` (the region / phrase / GloVe HDF5 files of Wang et al.),
``collaborative_experts`` (Collaborative Experts / TeachText feature pickles). Bad input raises a
:class:`~groundkit.errors.DataError` naming the file, the key and the expected shape.
"""
