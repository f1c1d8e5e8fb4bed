"""Forked DataLoader workers must not finalise the parent's dead loader iterators.

In a Jupyter kernel the finaliser's traceback goes to a ZMQ socket shared with
the parent and libzmq aborts the worker ("DataLoader worker exited
unexpectedly", chapter 04 of the cpu book). ``import wbclib`` makes forked
children freeze what they inherit; without it, the same script reproduces the
finaliser error.
"""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import gc, sys
    if sys.argv[1] == "wbclib":
        import wbclib  # noqa: F401
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Collecting(Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            gc.collect()  # what a worker that allocates a lot eventually does
            return torch.zeros(1)

    class Holder:
        pass

    gc.disable()  # the dead iterator survives until the next fork, as in a busy kernel
    old = iter(DataLoader(Collecting(), num_workers=1))
    next(old)
    holder = Holder(); holder.me = holder; holder.it = old  # only the collector frees a cycle
    del old, holder
    for _ in DataLoader(Collecting(), num_workers=1):
        pass
    print("done")
""")


def run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)


def test_forked_workers_leave_the_parents_dead_iterators_alone():
    without = run("plain")
    assert "can only test a child process" in without.stderr  # the failure is real without the fix
    fixed = run("wbclib")
    assert fixed.returncode == 0 and fixed.stdout.strip() == "done"
    assert "can only test a child process" not in fixed.stderr, fixed.stderr
