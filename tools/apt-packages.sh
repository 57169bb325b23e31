#!/usr/bin/env bash
# System packages the project and its tests use; `make setup` runs this when it is executable.
# Idempotent: installs only what is missing and runs `apt-get update` at most once.
#   slurmctld slurmd slurm-client munge   single-node Slurm for tests/test_slurm.py
#                                          (launch/slurm/local_cluster.sh starts it)
#   the shell linter "shellcheck"          lints the launch scripts (tests/test_slurm.py)
#   chromium                               headless browser: the HTML report and MLflow UI tests
# Needs root (or sudo); without either it lists what is missing and exits 0 so that `make setup`
# still builds the venv (the tests that need these binaries then skip and say why).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge shellcheck libturbojpeg0-dev libopencv-dev pkg-config chromium)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "apt-packages: all installed (${PACKAGES[*]})"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "apt-packages: not root and no passwordless sudo; missing: ${missing[*]}" >&2
    echo "apt-packages: install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 0
fi

echo "apt-packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
