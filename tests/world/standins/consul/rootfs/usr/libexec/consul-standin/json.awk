# Strict JSON reader for the consul stand-in (busybox awk).
# Reads one JSON document; prints one line per value:
#   PATH <TAB> TYPE <TAB> VALUE
# PATH joins object keys with "." and array indexes as "[N]" (top level: "");
# TYPE is string, number, bool, null, object (printed when the object opens) or
# array (printed when it closes, VALUE = its length). Tabs and newlines inside
# strings become spaces. On a syntax error prints "!error <TAB> MESSAGE" and exits 1,
# worded like Go's encoding/json.
function fail(m) { print "!error\t" m; failed = 1; exit 1 }
function ch() { return substr(s, pos, 1) }
function ws(   c) {
  while (pos <= n) {
    c = substr(s, pos, 1)
    if (c == " " || c == "\t" || c == "\n" || c == "\r") pos++
    else break
  }
}
function emit(p, t, v) { gsub(/[\t\n\r]/, " ", v); print p "\t" t "\t" v }
function str(   out, c, rest, e) {
  # pos is on the opening quote
  pos++
  out = ""
  while (1) {
    if (pos > n) fail("unexpected end of JSON input")
    rest = substr(s, pos)
    if (match(rest, /^[^"\\]+/)) {
      out = out substr(rest, 1, RLENGTH)
      pos += RLENGTH
      continue
    }
    c = substr(s, pos, 1)
    if (c == "\"") { pos++; return out }
    # backslash escape
    e = substr(s, pos + 1, 1)
    if (e == "\"" || e == "\\" || e == "/") { out = out e; pos += 2 }
    else if (e == "n" || e == "r" || e == "t") { out = out " "; pos += 2 }
    else if (e == "b" || e == "f") { pos += 2 }
    else if (e == "u" && substr(s, pos + 2, 4) ~ /^[0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F]$/) { out = out "?"; pos += 6 }
    else fail("invalid character '" e "' in string escape code")
  }
}
function value(p,   c, rest) {
  ws()
  if (pos > n) fail("unexpected end of JSON input")
  c = ch()
  if (c == "{") { object(p); return }
  if (c == "[") { array(p); return }
  if (c == "\"") { emit(p, "string", str()); return }
  rest = substr(s, pos)
  if (substr(rest, 1, 4) == "true") { pos += 4; emit(p, "bool", "true"); return }
  if (substr(rest, 1, 5) == "false") { pos += 5; emit(p, "bool", "false"); return }
  if (substr(rest, 1, 4) == "null") { pos += 4; emit(p, "null", ""); return }
  if (match(rest, /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/)) {
    emit(p, "number", substr(rest, 1, RLENGTH)); pos += RLENGTH; return
  }
  fail("invalid character '" c "' looking for beginning of value")
}
function object(p,   k, c) {
  pos++
  emit(p, "object", "")
  ws()
  if (ch() == "}") { pos++; return }
  while (1) {
    ws()
    if (pos > n) fail("unexpected end of JSON input")
    if (ch() != "\"") fail("invalid character '" ch() "' looking for beginning of object key string")
    k = str()
    ws()
    if (pos > n) fail("unexpected end of JSON input")
    if (ch() != ":") fail("invalid character '" ch() "' after object key")
    pos++
    value(p == "" ? k : p "." k)
    ws()
    if (pos > n) fail("unexpected end of JSON input")
    c = ch()
    if (c == ",") { pos++; continue }
    if (c == "}") { pos++; return }
    fail("invalid character '" c "' after object key:value pair")
  }
}
function array(p,   i, c) {
  pos++
  i = 0
  ws()
  if (ch() == "]") { pos++; emit(p, "array", 0); return }
  while (1) {
    value(p "[" i "]")
    i++
    ws()
    if (pos > n) fail("unexpected end of JSON input")
    c = ch()
    if (c == ",") { pos++; continue }
    if (c == "]") { pos++; emit(p, "array", i); return }
    fail("invalid character '" c "' after array element")
  }
}
{ s = s $0 "\n" }
END {
  if (failed) exit 1
  n = length(s)
  pos = 1
  ws()
  if (pos > n) fail("EOF")
  if (ch() != "{") fail("invalid character '" ch() "' looking for beginning of object: a config file must hold a JSON object")
  value("")
  ws()
  if (pos <= n) fail("invalid character '" ch() "' after top-level value")
}
