"""A small filesystem for ENOSPC tests: small_fs() mounts a tmpfs of a
given size (the tests run as root) and unmounts it on exit; fill() writes
a file until the filesystem is full."""
import contextlib
import os
import subprocess


@contextlib.contextmanager
def small_fs(tmp_path, size="2m", name="mnt"):
    """A tmpfs of `size` mounted at tmp_path/name; unmounted on exit."""
    mnt = tmp_path / name
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                    str(mnt)], check=True, capture_output=True, timeout=60)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=60)


def fill(folder, name="filler"):
    """Write folder/name until the filesystem is full (ENOSPC)."""
    fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(100000):     # bounded: 400 MB at most
            os.write(fd, b"\xaa" * 4096)
        raise AssertionError("the filesystem did not fill up")
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)
