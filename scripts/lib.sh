# Shared by the scripts in this directory (sourced, not run).

# The cargo target directory (honours CARGO_TARGET_DIR and workspace config).
target_dir() {
  cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])'
}
