"""Linters: checks that read rendered or hand-written files (`meshctl lint`), apart from the pure
renderers in render/.

    envoy    lint_bootstrap (an Envoy bootstrap, optionally the files it names), lint_mesh
"""
