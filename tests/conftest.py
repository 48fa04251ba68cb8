"""Test-session settings: the suite never reads or writes the user's caches.

Worlds (``GROUNDKIT_DATA``) and frozen-encoder feature caches (``GROUNDKIT_FEATURE_CACHE``) live in one
temporary folder made for this test run and removed after it, so a test sees the same world whether or not a
demo, an older groundkit or another test run left caches behind (set ``GROUNDKIT_TEST_KEEP=1`` to keep it).
"""

import atexit
import os
import shutil
import tempfile

_ROOT = tempfile.mkdtemp(prefix="groundkit-test-")
os.environ["GROUNDKIT_DATA"] = os.path.join(_ROOT, "data")
os.environ["GROUNDKIT_FEATURE_CACHE"] = os.path.join(_ROOT, "features")
# trainings started by the tests share the cores among themselves only, not with trainings that other
# processes on this machine run at the same time (whose number would make thread counts vary)
os.environ["GROUNDKIT_SHARE_DIR"] = os.path.join(_ROOT, "share")
if not os.environ.get("GROUNDKIT_TEST_KEEP"):
    atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
