"""Test-session settings."""

import os
import tempfile

# trainings started by the tests share the cores among themselves only, not with trainings that other
# processes on this machine run at the same time (whose number would make thread counts vary)
os.environ.setdefault("GROUNDKIT_SHARE_DIR", tempfile.mkdtemp(prefix="groundkit-test-share-"))
