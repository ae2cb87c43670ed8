"""A fake `gs://` for tests: every `gs://bucket/path` is the local file `<root>/bucket/path`; no network.

Three layers reach GCS, and each is pointed at the local folder:
  - etils.epath (what gptrl.fileio and orbax's file handling use): with TensorFlow absent (or EPATH_USE_TF=0) it
    goes through fsspec's "gcs" filesystem; `install` registers a local directory filesystem under the "gs" and
    "gcs" protocols in its place. Its paths look like gcsfs's ("bucket/path", no protocol).
  - tensorstore (orbax's array files) has its own GCS driver: orbax asks `gcs_utils.get_kvstore_for_gcs` for the
    kvstore spec, replaced here by a "file" driver spec on the same local folder.
  - orbax asks the GCS API whether a bucket has a hierarchical namespace (google-cloud-storage); the fake says no,
    and gptrl.fileio stops asking for that package.

Use in-process with `install(root)`, or run a command under it as a subprocess:
  python tests/fake_gcs.py ROOT -m gptrl.launch --config ...
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Callable

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry


class LocalBucketFileSystem(DirFileSystem):
  """`gs://bucket/key` -> `<root>/bucket/key`, with gcsfs's path forms."""
  protocol = ("gs", "gcs")
  root = ""  # set by install()

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's options are accepted and ignored
    del args, finalize_on_close, kwargs
    if not type(self).root:
      raise RuntimeError("fake_gcs.install(root) was not called.")
    super().__init__(path=type(self).root, fs=LocalFileSystem(auto_mkdir=True))


def local_path(url: str) -> str:
  """The local file behind `gs://bucket/key`."""
  assert url.startswith("gs://"), url
  return os.path.join(LocalBucketFileSystem.root, url[len("gs://"):])


def install(root: str) -> Callable[[], None]:
  """Points gs:// (epath, fsspec, orbax, tensorstore, gptrl.fileio) at the folder `root` for this process; returns
  the function that undoes it."""
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=import-outside-toplevel
  from gptrl import fileio  # pylint: disable=import-outside-toplevel
  saved = {"env": os.environ.get("EPATH_USE_TF"), "kvstore": gcs_utils.get_kvstore_for_gcs,
           "hns": gcs_utils.is_hierarchical_namespace_enabled, "requirements": fileio.REQUIREMENTS["gs"]}
  os.environ["EPATH_USE_TF"] = "0"  # epath would prefer tf.io.gfile if TensorFlow were installed
  os.makedirs(root, exist_ok=True)
  LocalBucketFileSystem.root = os.path.abspath(root)
  LocalBucketFileSystem.clear_instance_cache()
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, LocalBucketFileSystem, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access

  def kvstore_for_gcs(path: str) -> dict:
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(LocalBucketFileSystem.root, bucket, key)}

  gcs_utils.get_kvstore_for_gcs = kvstore_for_gcs
  gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
  # The GCS API client (google-cloud-storage) is only needed for the call replaced above.
  fileio.REQUIREMENTS["gs"] = tuple(r for r in saved["requirements"] if r[0] != "google-cloud-storage")
  fileio._CHECKED.discard("gs")  # pylint: disable=protected-access

  def uninstall() -> None:
    if saved["env"] is None:
      os.environ.pop("EPATH_USE_TF", None)
    else:
      os.environ["EPATH_USE_TF"] = saved["env"]
    for protocol in ("gs", "gcs"):
      _registry.pop(protocol, None)  # fsspec imports gcsfs again when asked, if it is installed
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    gcs_utils.get_kvstore_for_gcs = saved["kvstore"]
    gcs_utils.is_hierarchical_namespace_enabled = saved["hns"]
    fileio.REQUIREMENTS["gs"] = saved["requirements"]
    fileio._CHECKED.discard("gs")  # pylint: disable=protected-access
  return uninstall


if __name__ == "__main__":
  install(sys.argv[1])
  if len(sys.argv) < 4 or sys.argv[2] != "-m":
    sys.exit("usage: python tests/fake_gcs.py ROOT -m MODULE [ARGS...]")
  sys.argv = [sys.argv[3]] + sys.argv[4:]
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
