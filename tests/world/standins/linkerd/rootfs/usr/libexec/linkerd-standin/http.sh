# Shared by admin.sh and router.sh (sourced): read one HTTP request from stdin,
# drop connections made to an address the real server would not listen on.
# Sets: method target path local_ip remote. Needs BIND_IP.
LIB=/usr/libexec/linkerd-standin
CR=$(printf '\r')

respond() { # CODE REASON CONTENT-TYPE BODY
  len=$(printf '%s' "$4" | wc -c)
  printf 'HTTP/1.1 %s %s\r\nContent-Type: %s\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
    "$1" "$2" "$3" "$len" "$4"
}

ino=$(readlink /proc/self/fd/0 2>/dev/null)
ino=${ino#socket:\[}
ino=${ino%\]}
set -- $(awk -v ino="$ino" -f "$LIB/sockaddr.awk" /proc/net/tcp /proc/net/tcp6 2>/dev/null)
local_ip=${1:-?}
remote=${3:-?}
case "$BIND_IP" in
  0.0.0.0 | "") ;;
  *) [ "$local_ip" = "$BIND_IP" ] || exit 0 ;;
esac

IFS= read -r -t 10 line || exit 0
line=${line%"$CR"}
method=${line%% *}
target=${line#* }
target=${target%% *}
clen=0
while IFS= read -r -t 10 h; do
  h=${h%"$CR"}
  [ -z "$h" ] && break
  case "$h" in
    [Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh]:*) clen=$(echo ${h#*:}) ;;
  esac
done
case "$clen" in '' | *[!0-9]*) clen=0 ;; esac
[ "$clen" -gt 0 ] && head -c "$clen" >/dev/null
path=${target%%\?*}
