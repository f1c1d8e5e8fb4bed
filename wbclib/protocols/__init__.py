"""Protocols: the only code that reads a profile's settings and writes results.

Each module runs one benchmark of the book on the algorithms of ``wbclib``
(which know nothing of profiles or result folders): it chooses run folders
with :func:`wbclib.runs.run` (named by configuration keys and the hash of
configuration, inputs and code), writes into them atomically, and returns
tables whose ``run_dir`` column tells notebooks where each result lives.

One module per chapter's benchmark: ``pbc_lt`` (03, 05, 06),
``crosslab_erm`` (04), ``crosslab_dg`` (07), ``restoration`` (08),
``segmentation`` (09), ``rescue`` (10), ``system`` (11; ``wbc train``);
``common`` holds what they share. ``eda`` holds chapter 01's tables of the
data and ``long_tail`` the tables of chapters 05 and 06 over ``pbc_lt``'s
results (neither trains nor writes anything).
"""
