#!/bin/sh
echo "$GREETING ($(cat /usr/local/bin/arch))"
