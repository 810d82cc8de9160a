# Makes `recipes/` a package so `tune run --nproc_per_node N recipes/x.py` (torchrun: `-m recipes.x`) loads our
# recipes rather than the `recipes` package that torchtune's wheel installs in site-packages.
