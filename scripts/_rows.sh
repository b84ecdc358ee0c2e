# Shared by the check scripts: each check is a row (name, status, detail); the run ends with one pass/fail table.
ROWS=()
FAILED=0
record() {  # name status detail
    ROWS+=("$1"$'\t'"$2"$'\t'"$3")
    [ "$2" = "ok" ] || FAILED=1
}
print_rows() {  # first-column-title width script-name summary
    printf '\n%-*s %-6s %s\n' "$2" "$1" "status" "detail"
    local r name status detail
    for r in "${ROWS[@]}"; do
        IFS=$'\t' read -r name status detail <<<"$r"
        printf '%-*s %-6s %s\n' "$2" "$name" "$status" "$detail"
    done
    printf '\n%s: %s (%s)\n' "$3" "$([ "$FAILED" = 0 ] && echo PASS || echo FAIL)" "$4"
}
