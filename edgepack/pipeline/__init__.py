"""The packaging pipeline: what flows through it (``job``), the stage interface (``stage``), the list of
stages for a target (``plan``) and the run over every target (``run``)."""
