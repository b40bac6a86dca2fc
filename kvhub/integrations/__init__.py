"""kvhub inside other systems. Each integration depends on kvhub, never the reverse, and imports its host library
only in its own module (``kvhub.integrations.lmcache`` needs the ``lmcache`` extra); :mod:`.chunks` is the
host-independent byte format they share."""
