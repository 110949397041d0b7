#!/usr/bin/env bash
# Build kiln's guest kernel (vmlinux) from Debian's linux-source-6.1 and cache it outside the repo.
#
# Usage: kernel-config/build.sh [--print-path] [--verbose] [--flavour default|pvm]
#   (no flag)     build if needed, then print the cached vmlinux path (progress on stderr)
#   --print-path  print only the path on stdout (building first if needed)
#   --verbose     stream the build output instead of writing it only to the log file
#   --flavour F   default (patches/) or pvm (patches/ then patches-pvm/: for PVM hosts)
#
# Cache: ${KILN_KERNEL_CACHE:-/var/cache/kiln/kernel}/<key>/vmlinux (pvm flavour: .../pvm/<key>/),
# plus a stable link per flavour to the last one built or returned: <cache>/vmlinux, <cache>/pvm/vmlinux
# where <key> is the sha256 of
# the recipe version below, the Debian source package version, kiln.config and every
# patches/*.patch (applied in name order); for the pvm flavour also the flavour name and every
# patches-pvm/*.patch (applied after patches/). A cached key is returned without touching the build.
# Builds hold a flock on the cache root and publish with an atomic rename, so concurrent callers
# either wait for the one build or find its result.
# The source tree and the kbuild object directory live in <cache>/build/ and are reused across
# config changes (kbuild rebuilds only what a config change touches).
set -euo pipefail
# Everything runs inside main(), which bash parses completely before running it: editing this
# file while a build is running cannot change what the running build executes.
main() {
    # Bump when the recipe (commands below) changes in a way that changes the output.
    RECIPE_VERSION=1
    SRC_PKG=linux-source-6.1
    SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
    DEPS=(linux-source-6.1 flex bison bc libelf-dev libssl-dev build-essential)

    HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    FRAGMENT="$HERE/kiln.config"
    CACHE_ROOT="${KILN_KERNEL_CACHE:-/var/cache/kiln/kernel}"

    print_only=0
    verbose=0
    flavour=default
    args=("$@")
    while (($#)); do
        case "$1" in
            --print-path) print_only=1 ;;
            --verbose) verbose=1 ;;
            --flavour)
                [[ $# -ge 2 ]] || { echo "build.sh: --flavour needs a value (default|pvm)" >&2; exit 2; }
                flavour="$2"; shift ;;
            --flavour=*) flavour="${1#--flavour=}" ;;
            -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
            *) echo "build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
        esac
        shift
    done
    case "$flavour" in
        default|pvm) ;;
        *) echo "build.sh: unknown flavour '$flavour' (default|pvm)" >&2; exit 2 ;;
    esac

    say() { echo "kiln-kernel: $*" >&2; }
    die() { echo "kiln-kernel: error: $*" >&2; exit 1; }

    [[ -f "$FRAGMENT" ]] || die "$FRAGMENT: config fragment missing"
    # A flavour may add its own fragment, merged after kiln.config (its lines win).
    fragments=("$FRAGMENT")
    flavour_fragment="$HERE/kiln-$flavour.config"
    [[ "$flavour" == default || ! -f "$flavour_fragment" ]] || fragments+=("$flavour_fragment")

    # --- dependencies ----------------------------------------------------------------------------
    missing=()
    for pkg in "${DEPS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        [[ $(id -u) -eq 0 ]] || die "need root to apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >&2; } \
            || die "apt-get install ${missing[*]} failed"
    fi
    [[ -f "$SRC_TARBALL" ]] || die "$SRC_TARBALL missing although $SRC_PKG is installed"
    src_version="$(dpkg-query -W -f='${Version}' "$SRC_PKG")"

    # --- cache key -------------------------------------------------------------------------------
    shopt -s nullglob
    patches=("$HERE"/patches/*.patch)
    [[ "$flavour" == default ]] || patches+=("$HERE"/patches-"$flavour"/*.patch)
    shopt -u nullglob
    hash_inputs() {
        printf 'recipe=%s\nsource=%s %s\n' "$RECIPE_VERSION" "$SRC_PKG" "$src_version"
        # (no line for the default flavour: its keys stay what they were before flavours existed)
        [[ "$flavour" == default ]] || printf 'flavour=%s\n' "$flavour"
        printf '== kiln.config\n'; cat "$FRAGMENT"
        # (likewise no line without a flavour fragment)
        [[ ${#fragments[@]} -eq 1 ]] || { printf '== %s\n' "$(basename "$flavour_fragment")"; cat "$flavour_fragment"; }
        local p
        for p in "${patches[@]}"; do printf '== patch %s\n' "$(basename "$p")"; cat "$p"; done
    }
    key="$(hash_inputs | sha256sum | cut -d' ' -f1)"
    # The source tree and the object directory depend on the source version only; patch sets are
    # switched in place (see below) so that changing a patch recompiles only the files it touches.
    src_key="$(printf 'recipe=%s\nsource=%s\n' "$RECIPE_VERSION" "$src_version" \
        | sha256sum | cut -c1-16)"
    # Other flavours live one level down, each with its own stable link (see update_link).
    out_dir="$CACHE_ROOT/$key"
    [[ "$flavour" == default ]] || out_dir="$CACHE_ROOT/$flavour/$key"
    out="$out_dir/vmlinux"

    # Stable link to the kernel this flavour last built or returned: <cache>/vmlinux and
    # <cache>/pvm/vmlinux, what host-vmm's `--kernel auto` and the runtime resolve
    # (host-vmm/src/kernel_pick.rs). Relative, replaced atomically; a cache we may not write
    # (another user's) keeps its old link.
    link="$(dirname "$out_dir")/vmlinux"
    update_link() {
        local tmp_link
        tmp_link="$(dirname "$link")/.vmlinux-link.$$"
        { ln -sfn "$key/vmlinux" "$tmp_link" && mv -Tf "$tmp_link" "$link"; } 2>/dev/null \
            || { rm -f "$tmp_link" 2>/dev/null; say "note: cannot update $link"; }
    }
    finish() {
        update_link
        if ((print_only)); then echo "$out"; else say "vmlinux: $out"; echo "$out"; fi
        exit 0
    }
    [[ -f "$out" ]] && finish

    mkdir -p "$CACHE_ROOT" || die "cannot create cache root $CACHE_ROOT"
    exec 9>"$CACHE_ROOT/.lock"
    flock 9
    [[ -f "$out" ]] && finish # someone else built it while we waited

    rm -rf "$CACHE_ROOT"/.tmp-* # left by a build that died while publishing (we hold the lock)
    build_root="$CACHE_ROOT/build"
    src="$build_root/src-$src_key"
    obj="$build_root/obj-$src_key"
    # A flavour with its own config fragment gets its own object directory: switching flavours
    # then recompiles only what the patch switch touches, not every file the config changes.
    [[ ${#fragments[@]} -eq 1 ]] || obj="$build_root/obj-$src_key-$flavour"
    log="$build_root/build-$key.log"
    mkdir -p "$build_root"
    : >"$log"

    run() { # run a step, logging; show the log tail on failure
        local what="$1"; shift
        echo "+ $*" >>"$log"
        if ((verbose)); then
            "$@" 2>&1 | tee -a "$log" >&2 || { die "$what failed (log: $log)"; }
        else
            "$@" >>"$log" 2>&1 || {
                echo "kiln-kernel: $what failed; last lines of $log:" >&2
                tail -n 40 "$log" >&2
                exit 1
            }
        fi
    }

    start=$(date +%s)
    say "building vmlinux $key (log: $log)"

    # --- source tree (extracted once per source version) -----------------------------------------
    if [[ ! -f "$src/.kiln-ready" ]]; then
        # Trees of other source versions are dead weight (1.4 GB each).
        rm -rf "$build_root"/src-* "$build_root"/obj-*
        tmp_src="$build_root/.src-tmp"
        rm -rf "$tmp_src"
        mkdir -p "$tmp_src/.kiln-patches"
        run "extracting $SRC_TARBALL" tar -xf "$SRC_TARBALL" -C "$tmp_src" --strip-components=1
        touch "$tmp_src/.kiln-ready"
        mv "$tmp_src" "$src"
    fi

    # --- patches: the tree keeps copies of what is applied in .kiln-patches/ ---------------------
    mkdir -p "$src/.kiln-patches"
    patch_set_hash() { # hash of the named patch files, by base name and content
        local p
        for p in "$@"; do printf '== %s\n' "$(basename "$p")"; cat "$p"; done | sha256sum
    }
    shopt -s nullglob
    applied=("$src"/.kiln-patches/*.patch)
    shopt -u nullglob
    if [[ "$(patch_set_hash "${applied[@]}")" != "$(patch_set_hash "${patches[@]}")" ]]; then
        for ((i = ${#applied[@]} - 1; i >= 0; i--)); do
            if ! patch -d "$src" -p1 -R --batch --silent -i "${applied[i]}" >>"$log" 2>&1; then
                # The tree is in an unknown state: start again from the tarball.
                say "cannot revert $(basename "${applied[i]}"); re-extracting the source"
                rm -rf "$src" "$obj"
                exec "${BASH_SOURCE[0]}" "${args[@]}"
            fi
            rm -f "${applied[i]}"
        done
        for p in "${patches[@]}"; do
            run "checking $(basename "$p")" patch -d "$src" -p1 --forward --batch --dry-run -i "$p"
            run "applying $(basename "$p")" patch -d "$src" -p1 --forward --batch -i "$p"
            cp "$p" "$src/.kiln-patches/"
        done
    fi

    # --- configuration: tinyconfig + fragment + olddefconfig, then verify ------------------------
    mkdir -p "$obj"
    kmake() { make -C "$src" O="$obj" ARCH=x86_64 "$@"; }
    run "make tinyconfig" kmake tinyconfig
    run "merging kiln.config" \
        "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "${fragments[@]}"
    run "make olddefconfig" kmake olddefconfig

    # Every line of the fragments must survive; a kiln.config line whose symbol the flavour
    # fragment sets again is checked in the flavour fragment's form only.
    bad=()
    flavour_syms=""
    [[ ${#fragments[@]} -eq 1 ]] \
        || flavour_syms="$(grep -oE 'CONFIG_[A-Za-z0-9_]+' "$flavour_fragment" | sort -u)"
    for frag in "${fragments[@]}"; do
        while IFS= read -r line; do
            if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
                sym="${BASH_REMATCH[1]}"
                [[ "$frag" != "$FRAGMENT" ]] || ! grep -qxF "$sym" <<<"$flavour_syms" || continue
                grep -qxF "$line" "$obj/.config" \
                    || bad+=("$line (got: $(grep -E "^(# )?$sym[= ]" "$obj/.config" || echo unset))")
            elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
                sym="${BASH_REMATCH[1]}"
                [[ "$frag" != "$FRAGMENT" ]] || ! grep -qxF "$sym" <<<"$flavour_syms" || continue
                ! grep -qE "^$sym=" "$obj/.config" \
                    || bad+=("$line (got: $(grep -E "^$sym=" "$obj/.config"))")
            fi
        done <"$frag"
    done
    if ((${#bad[@]})); then
        echo "kiln-kernel: error: these kiln.config options did not survive olddefconfig:" >&2
        printf '  %s\n' "${bad[@]}" >&2
        exit 1
    fi

    # --- build and publish -----------------------------------------------------------------------
    run "make vmlinux" kmake -j"$(nproc)" vmlinux
    tmp_out="$(mktemp -d "$CACHE_ROOT/.tmp-$key.XXXXXX")"
    chmod 755 "$tmp_out"
    cp "$obj/vmlinux" "$tmp_out/vmlinux"
    cp "$obj/.config" "$tmp_out/config"
    cp "$log" "$tmp_out/build.log"
    rm -rf "$out_dir" # a partial directory without vmlinux can only come from a crash
    mkdir -p "$(dirname "$out_dir")"
    mv -T "$tmp_out" "$out_dir"
    say "built in $(( $(date +%s) - start )) s, $(stat -c %s "$out") bytes"
    finish
}

main "$@"
