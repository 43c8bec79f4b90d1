"""``prx ablate``: what each trick of the recipe buys, at equal compute, on the same data, as one table.

:mod:`~prx.ablate.arms` (the arms), :mod:`~prx.ablate.budget` (equal steps, FLOPs or minutes),
:mod:`~prx.ablate.runs` (the settings, an arm × seed and its record ``ablate.json``),
:mod:`~prx.ablate.runner` (ordinary run directories, skipped when finished, resumed when not),
:mod:`~prx.ablate.measure` (held-out validation loss, the shapes judge, image metrics, costs),
:mod:`~prx.ablate.stats` (mean ± spread over seeds, the verdict against ``full``),
:mod:`~prx.ablate.report` and :mod:`~prx.ablate.plots` (results.md/.csv/.json, PNGs, TensorBoard).

The package imports nothing itself: ``prx.cli`` reads the built-in arms' names from :mod:`~prx.ablate.arms`
(no torch) without loading the rest. Imports go one way: arms, budget → runs → measure, stats → plots → report →
runner (the runner calls the report; the report reads the runs' records and never imports the runner).
"""
