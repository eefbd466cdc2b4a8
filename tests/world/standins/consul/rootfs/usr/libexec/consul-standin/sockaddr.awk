# Prints "LOCAL_IP LOCAL_PORT REMOTE_IP:REMOTE_PORT" of the TCP socket whose inode is
# `ino`, read from /proc/net/tcp and /proc/net/tcp6 (IPv4-mapped IPv6 shown as IPv4).
function hex(h,   i, v) {
  h = toupper(h); v = 0
  for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789ABCDEF", substr(h, i, 1)) - 1
  return v
}
function ip4(a) {  # 8 hex digits, host (little-endian) order
  return hex(substr(a, 7, 2)) "." hex(substr(a, 5, 2)) "." hex(substr(a, 3, 2)) "." hex(substr(a, 1, 2))
}
function ip(a) {
  if (length(a) == 8) return ip4(a)
  if (toupper(substr(a, 1, 24)) == "0000000000000000FFFF0000") return ip4(substr(a, 25, 8))
  return "[" a "]"
}
FNR > 1 && $10 == ino {
  split($2, l, ":"); split($3, r, ":")
  print ip(l[1]), hex(l[2]), ip(r[1]) ":" hex(r[2])
  exit
}
