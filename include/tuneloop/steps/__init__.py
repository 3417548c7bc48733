"""The loop's steps: one module per step, the single implementation that the CLI subcommand
and the Airflow task both call. Each step takes a :class:`~tuneloop.steps.loop.Loop` and
JSON-able arguments and returns a JSON-able dict (the task's XCom).

=================  ==========================================  ==============================
module             steps                                       CLI / Airflow task
=================  ==========================================  ==============================
``loop``           the Loop, from a config or an Airflow task  every command / every task
``monitor``        ``check_drift`` (+ performance drift)       ``drift --store`` / check_drift
``intake``         ``pull_step``, ``validate_step``            ``pull`` / pull, validate
``train``          ``train_step``                              ``train --register`` / train
``evaluate``       ``evaluate_step``                           ``evaluate`` / evaluate
``gate``           ``gate_step``                               ``gate`` / gate
``serve``          deploy, verify, record, reconcile, rollback ``deploy`` ... / deploy ...
=================  ==========================================  ==============================
"""
