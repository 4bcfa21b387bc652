"""The two runners of the one recipe: in process (:mod:`.local`, the reference) and on Ray (:mod:`.ray`).

Both follow the stage table (:mod:`vlsi_ray.recipe.stages`) over the same run layout, with the same
objectives, seeds and batch order; :mod:`.base` holds what they share.
"""
