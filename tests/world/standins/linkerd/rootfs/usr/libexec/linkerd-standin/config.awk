# Crude reader of a linkerd 1.x YAML config for the linkerd stand-in (busybox awk).
# Prints what the stand-in needs, one fact a line:
#   top KEY                              each top-level key
#   admin ip|port VALUE                  admin.ip / admin.port
#   router N protocol|label VALUE        routers[N].protocol / .label
#   server N ip|port VALUE               routers[N].servers[M].ip / .port (one "server N -" line
#                                        opens each server entry)
# or "!error MESSAGE" (and exit 1) on what a YAML parser would reject: tab
# indentation, a top-level line that is not a "key:" entry, a top-level sequence.
# Understands block mappings and sequences ("- " items, also at their key's column),
# block scalars ("key: |" / ">"), comments, and a flow mapping for admin
# ("admin: {ip: 0.0.0.0, port: 9990}"). It is not a YAML parser.
function fail(m) { print "!error " m; failed = 1; exit 1 }
function unquote(v) {
  sub(/^[ ]+/, "", v); sub(/[ ]+$/, "", v)
  if (v ~ /^".*"$/ || v ~ /^'.*'$/) v = substr(v, 2, length(v) - 2)
  return v
}
function strip_comment(s) {
  # " #" starts a comment unless inside quotes (good enough for configs).
  if (s ~ /^#/) return ""
  if (index(s, "\"") == 0 && index(s, "'") == 0) sub(/[ ]+#.*$/, "", s)
  return s
}
BEGIN { top = ""; scalar_indent = -1; router = -1; server = -1 }
{
  line = $0
  sub(/\r$/, "", line)
  if (line ~ /^[ ]*\t/) fail("line " NR ": found character '\\t' that cannot start any token")
  if (line ~ /^[ ]*$/) next
  match(line, /^[ ]*/)
  indent = RLENGTH
  body = substr(line, indent + 1)
  # Inside a block scalar: lines indented more than its key.
  if (scalar_indent >= 0) {
    if (indent > scalar_indent) next
    scalar_indent = -1
  }
  body = strip_comment(body)
  if (body == "") next
  if (indent == 0 && (body == "---" || body == "...")) next

  # A sequence item: "- rest"; its key (if any) sits 2 columns further.
  dash = 0
  if (body ~ /^-( |$)/) {
    dash = 1
    dash_col = indent
    body = substr(body, 3)
    indent += 2
    sub(/^[ ]+/, "", body)
  }
  key = ""; value = ""
  if (match(body, /^("[^"]*"|'[^']*'|[^] :{}[,#][^:]*):( |$)/)) {
    key = unquote(substr(body, 1, RLENGTH - (substr(body, RLENGTH, 1) == " " ? 2 : 1)))
    value = substr(body, RLENGTH + 1)
    sub(/^[ ]+/, "", value)
  }
  if (key != "" && value ~ /^[|>][-+0-9]*$/) scalar_indent = indent

  if (dash && dash_col == 0 && top == "") fail("line " NR ": the config must be a mapping, not a sequence")
  if (!dash && indent == 0) {
    if (key == "") fail("line " NR ": expected a \"key: value\" entry at the top level: " body)
    top = key
    print "top " key
    child_indent = -1
    if (top == "admin" && value ~ /^\{.*\}$/) {
      n = split(substr(value, 2, length(value) - 2), kv, ",")
      for (i = 1; i <= n; i++) {
        split(kv[i], p, ":")
        k = unquote(p[1]); v = unquote(p[2])
        if (k == "ip" || k == "port") print "admin " k " " v
      }
    } else if (value != "" && (top == "admin" || top == "routers")) {
      if (!(top == "routers" && value ~ /^\[[ ]*\]$/))
        fail("line " NR ": " top " must be a " (top == "admin" ? "mapping" : "sequence"))
    }
    next
  }

  if (top == "admin") {
    if (child_indent < 0) child_indent = indent
    if (indent == child_indent && (key == "ip" || key == "port")) print "admin " key " " unquote(value)
    next
  }

  if (top == "routers") {
    # Router items: the dashes at the first column seen under "routers:".
    if (dash && (router < 0 || dash_col == router_col)) {
      if (router < 0) router_col = dash_col
      router++
      server = -1
      servers_indent = -1
      print "router " router " -"
    }
    if (router < 0) next
    # Router keys sit at router_col + 2.
    if (indent == router_col + 2 && key != "") {
      servers_indent = -1
      if (key == "protocol" || key == "label") print "router " router " " key " " unquote(value)
      if (key == "servers") { servers_indent = indent; server_col = -1 }
      next
    }
    if (servers_indent >= 0 && (dash ? dash_col >= servers_indent : indent > servers_indent)) {
      if (dash && (server_col < 0 || dash_col == server_col)) {
        if (server_col < 0) server_col = dash_col
        server++
        print "server " router " -"
      }
      if (server >= 0 && indent == server_col + 2 && (key == "ip" || key == "port"))
        print "server " router " " key " " unquote(value)
    }
  }
}
