#!/bin/sh
exec /bin/registrator -ip {{ instance.local_ipv4 }} -retry-attempts -1 consul://{{ instance.local_ipv4 }}:8500
