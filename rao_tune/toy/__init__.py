"""The toy: a task with a true reward, tiny hub-free assets, the paper's pipeline and the study, all on CPU.

- :mod:`rao_tune.toy.task`: prompts whose right answers are lists of items, and the graded true reward;
- :mod:`rao_tune.toy.assets`, :mod:`rao_tune.toy.families`: tiny tokenizers and random checkpoints (Llama 3,
  Qwen2.5, EuroLLM) in the formats real ones come in, for the tests and the tiny configs;
- :mod:`rao_tune.toy.pipeline`: SFT -> samples -> true rewards -> reward model -> annotation -> alignment ->
  greedy answers, each stage one of our recipes;
- :mod:`rao_tune.toy.study`: methods x grids x seeds, chosen on validation, reported on test; ablations; Fig. 2;
- :mod:`rao_tune.toy.plots`: its figures.
"""
