"""The conformance suite: one mesh.yaml policy, the same observable behaviour on every plane.

`scenario` holds the scenarios (data, `scenarios.yaml`) and their checks, `planes` runs a scenario's mesh on
one plane with real processes on 127.0.0.1, `run` plays the phases and compares. `meshctl conformance` and
the test suite (tests/conformance/) both run it.
"""
