"""A procedurally generated world of coloured shapes, and the recipe that trains the demo model on it.

world.py     seeded scenes (1-4 objects, captions, ground-truth boxes) and subject instances
detector.py  exact segmentation of the world: colour, kind, pattern and box of each object
metrics.py   caption fidelity, layout accuracy and instance fidelity of generated images
evaluation.py  the quality evaluation of a model on them (`evaluate(Settings(...))`; bench/quality.py)
instances.py instance images + caption templates for `cones2-train`
recipe.py    every training setting (`Recipe`); models.py builds the networks and writes the model dir
data.py, grounding.py, stages.py, loop.py, state.py   the training itself
train.py     `python -m cones2_train.demo_world.train --out DIR`

See docs/demo_model.md.
"""
