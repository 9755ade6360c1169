"""The demo model zoo: the shapes world, its attribute classifier, the recipe, the stage-by-stage build
(`python3 -m trainer.build_demo`), its metrics and routing measurements, and the evaluation's reference
features. Nothing outside trainer/demo/ imports it, except the command shims in trainer/."""
