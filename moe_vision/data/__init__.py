"""Data: the built-in procedurally generated benchmark (:mod:`.benchmark`) and LLaVA-format
conversations with their validation and batching (:mod:`.llava`)."""
