#!/usr/bin/env bash
# Installs bubblewrap (bwrap), the OS-level sandbox of model-written code
# (prunerep/evals/codeexec.py: the humaneval task). Idempotent and quiet; never fails the
# setup: where bwrap cannot be installed, code execution falls back to a fresh uid + Landlock
# (root only) or is refused with a one-line reason.
command -v bwrap >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; }
fi
command -v bwrap >/dev/null 2>&1 \
  || echo "sandbox-setup: bubblewrap (bwrap) is not installed (install it as root: apt-get install bubblewrap);" \
          "model-written code (humaneval) runs only where another isolation works, else it is refused" >&2
exit 0
