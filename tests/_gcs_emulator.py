"""`gcp-storage-emulator start ...` with one fix, for tests/_gcs_support.py.

  python tests/_gcs_emulator.py start --host 127.0.0.1 --port N --default-bucket B

The emulator's media downloads carry no `x-goog-generation` header; real GCS always sends it, and
tensorstore (orbax's array writes, OCDBT manifests) refuses a read without it ("Malformed
StorageGeneration"). This adds it (and `x-goog-metageneration`) from the object's metadata,
then runs the emulator's own command line.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001 - not found: the emulator's own handler answers
    obj = None
  if obj is not None:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routing table

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main
  sys.exit(main())
