"""Figures of training runs (`loopjax plot`): `runs` reads a workdir's logs, `figure` draws them.

matplotlib is an optional dependency (the `plot` extra); only `figure` imports it, so reading the
logs works without it.
"""
