"""wbclib: robust white-blood-cell classification under class imbalance and domain shift."""
import gc as _gc
import os as _os

# DataLoader workers are forked from the running process (a Jupyter kernel in the book) and
# inherit its unreachable objects. When a worker's garbage collector runs (stain jitter
# allocates enough to trigger it), it would finalise the parent's dead DataLoader iterators:
# their __del__ tries to stop workers that are not its children ("can only test a child
# process") and prints a traceback to stderr, which in a kernel is a ZMQ socket shared with
# the parent, so libzmq aborts the worker ("Assertion failed: pfd.revents & POLLIN"; chapter
# 04 of the cpu book). A forked child leaves inherited objects to the parent: they move to the
# collector's permanent generation and are never finalised there.
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_gc.freeze)
