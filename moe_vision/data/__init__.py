"""Data: the built-in procedurally generated benchmark (:mod:`.benchmark`; its questions and
answers in :mod:`.benchmark_tasks`, its images in :mod:`.benchmark_scenes`, opt-in categories in
:mod:`.benchmark_tiling`) and LLaVA-format data
at scale: record layouts (:mod:`.records`), the byte-offset index (:mod:`.index`), mixtures
(:mod:`.mixture`), the one validation path of training, evaluation and ``moe-vision data check``
(:mod:`.validation`, :mod:`.check`), and the dataset with its batching (:mod:`.llava`)."""
