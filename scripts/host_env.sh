# Sourced by the scripts: picks the ComfyUI host from a leading "--host NAME"
# (or RECE_HOST) and sets what the rest of the script uses:
#   RECE_HOST      0.3.75 (default: ComfyUI from the pinned PyPI wheel) or 0.33
#   venv           .venv or .venv-0.33 (the hosts' web-page pins clash)
#   requirements   scripts/requirements-host.txt or scripts/requirements-host-0.33.txt
#   host_args      the arguments after "--host NAME"
RECE_HOST="${RECE_HOST:-0.3.75}"
host_args=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --host) [ "$#" -ge 2 ] || { echo "--host needs a name: 0.3.75 or 0.33" >&2; exit 2; }
                RECE_HOST="$2"; shift 2 ;;
        --host=*) RECE_HOST="${1#--host=}"; shift ;;
        *) host_args+=("$1"); shift ;;
    esac
done
case "$RECE_HOST" in
    0.3.75) venv=.venv; requirements=scripts/requirements-host.txt ;;
    0.33)   venv=.venv-0.33; requirements=scripts/requirements-host-0.33.txt ;;
    *) echo "unknown host '$RECE_HOST': choose 0.3.75 (the default) or 0.33" >&2; exit 2 ;;
esac
export RECE_HOST
