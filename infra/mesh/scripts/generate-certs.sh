#!/usr/bin/env bash
# Generate the mesh PKI: CA (if missing), a certificate per service and mesh-client, then verify.
#
#   generate-certs.sh [--certs-dir DIR] [--valid-days N] [--config mesh.yaml] [--force]
#   generate-certs.sh DIR [VALID_DAYS]            (positional form, kept for older callers)
#
# --force replaces an existing CA; without it an existing CA is reused and only leaves are re-issued.
# meshctl is found as: $MESHCTL, <repo>/.venv/bin/meshctl, `meshctl` on PATH, else `python -m aivo_mesh`.
# $MESHCTL may hold a command with arguments, e.g. MESHCTL="/path/python -m aivo_mesh".
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../../.." && pwd)"

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

output_dir="./certs"
valid_days=""
config=""
force=0
positional=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        -d|--certs-dir|--output-dir|--cert-dir) [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
            output_dir="$2"; shift 2 ;;
        --certs-dir=*|--output-dir=*|--cert-dir=*) output_dir="${1#*=}"; shift ;;
        --valid-days) [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
            valid_days="$2"; shift 2 ;;
        --valid-days=*) valid_days="${1#*=}"; shift ;;
        -c|--config) [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
            config="$2"; shift 2 ;;
        --config=*) config="${1#*=}"; shift ;;
        -f|--force) force=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; positional+=("$@"); break ;;
        -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) positional+=("$1"); shift ;;
    esac
done

if [[ ${#positional[@]} -gt 2 ]]; then
    echo "error: too many arguments: ${positional[*]}" >&2; usage >&2; exit 2
fi
if [[ ${#positional[@]} -ge 1 ]]; then output_dir="${positional[0]}"; fi
if [[ ${#positional[@]} -ge 2 ]]; then valid_days="${positional[1]}"; fi
if [[ -n "${valid_days}" && ! "${valid_days}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: VALID_DAYS must be a positive integer, got '${valid_days}'" >&2; exit 2
fi

# Locate meshctl.
if [[ -n "${MESHCTL:-}" ]]; then
    # shellcheck disable=SC2206  # deliberate word splitting: MESHCTL may be "python -m aivo_mesh"
    meshctl=(${MESHCTL})
elif [[ -x "${repo_root}/.venv/bin/meshctl" ]]; then
    meshctl=("${repo_root}/.venv/bin/meshctl")
elif command -v meshctl >/dev/null 2>&1; then
    meshctl=(meshctl)
else
    python="python3"
    [[ -x "${repo_root}/.venv/bin/python" ]] && python="${repo_root}/.venv/bin/python"
    meshctl=("${python}" -m aivo_mesh)
fi

config_args=()
[[ -n "${config}" ]] && config_args=(--config "${config}")
days_args=()
[[ -n "${valid_days}" ]] && days_args=(--valid-days "${valid_days}")

if [[ -e "${output_dir}/ca/ca.crt" && ${force} -eq 0 ]]; then
    echo "CA exists in ${output_dir}/ca: reusing it (pass --force to replace it)"
else
    init_args=(certs init --certs-dir "${output_dir}" "${config_args[@]+"${config_args[@]}"}")
    [[ ${force} -eq 1 ]] && init_args+=(--force)
    "${meshctl[@]}" "${init_args[@]}"
fi

"${meshctl[@]}" certs issue --all --certs-dir "${output_dir}" \
    "${days_args[@]+"${days_args[@]}"}" "${config_args[@]+"${config_args[@]}"}"
"${meshctl[@]}" certs verify --certs-dir "${output_dir}" "${config_args[@]+"${config_args[@]}"}"
