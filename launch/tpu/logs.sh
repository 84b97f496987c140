#!/usr/bin/env bash
# Prints the last lines of the training log of every worker.
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone
on_all_workers "tail -n 50 ~/train.log"
