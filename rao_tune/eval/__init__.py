"""Evaluation of the checkpoints our recipes write: ``lm_eval_model.TorchtuneLM`` (an lm-eval model over a
torchtune model; needs the ``eval`` extra), generation with a KV cache, and reports."""
