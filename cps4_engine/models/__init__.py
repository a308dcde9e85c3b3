"""Networks: the stage-1 vision-language model (image encoder, text encoder, prompt-pixel
head, token cross-attention) and the stage-2 segmenter.

Import from the submodules: ``cps4_engine.models.text``, ``.image_encoder``, ``.vlm``,
``.segmenter``. They are not imported here so that loading one does not load the others'
dependencies (transformers is only needed by the text side).
"""
