#!/bin/sh
# Run by `sh` (mode 0640: it holds registrator's Consul token).
CONSUL_HTTP_TOKEN={{ secrets.registrator_token }}
export CONSUL_HTTP_TOKEN
exec /bin/registrator -ip {{ instance.local_ipv4 }} -retry-attempts -1 -cleanup -resync 60 -deregister always consul://{{ instance.local_ipv4 }}:8500
