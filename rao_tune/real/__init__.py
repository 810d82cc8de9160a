"""A real pretrained model through the paper's pipeline: SmolLM2-135M-Instruct on instructions with verifiable
constraints (:mod:`rao_tune.real.instructions`)."""
