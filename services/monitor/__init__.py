"""The eternal monitor: service health and saga SLAs, with its whole state in the compacted `monitor.state`."""
