"""The one recipe both runners follow: the stage table (:mod:`.stages`) and the run directory's layout (:mod:`.layout`).

Nothing in ``models/``, ``method/`` or ``signals/`` imports it (the arrows point from the runners
down); :mod:`.layout` is paths only, cheap to import anywhere.
"""
