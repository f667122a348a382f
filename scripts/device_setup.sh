#!/usr/bin/env bash
# Source on the lent GPU machine (no network there): install the carried wheels (.whl, built with
# ../shared/device/wheelhouse.sh) and the project itself, so `python train.py` and
# `python -m ttha.kernels.bench` run as they do elsewhere.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || return 1
export PYTHONUNBUFFERED=1
