"""Alerts: rules as data, a pure state machine, and sinks, run online by the recorder or by ``rldiag watch``.

>>> from rldiag.alerts import load_rules, Engine
>>> rules = load_rules()                     # the default pack (docs/alerts.md)
>>> sorted(rules.names)[:3]
['clip_spike', 'dead_groups', 'dead_groups_critical']

``Recorder(run_dir, alerts=True)`` evaluates the default pack as steps complete (see
:func:`make_online_alerts` for every accepted form of ``alerts=``); ``rldiag watch RUN`` follows a run
directory. docs/alerts.md describes the rule format, the sinks and the early-warning measurements.
"""

from rldiag.alerts.engine import (
    Engine,
    Notification,
    RuleState,
    RuleStatus,
    State,
    Transition,
    advance,
    fingerprint,
    initial_state,
    read_history,
)
from rldiag.alerts.follow import RunFollower
from rldiag.alerts.online import AlertConfig, OnlineAlerts, make_online_alerts, online_from_arg, run_label
from rldiag.alerts.rules import (
    SEVERITIES,
    Condition,
    Rule,
    RuleError,
    RuleSet,
    Settings,
    default_rules,
    load_rules,
    parse_rules,
)
from rldiag.alerts.sinks import (
    AlertmanagerSink,
    CallbackSink,
    ConsoleSink,
    JsonlSink,
    LoggingSink,
    Notifier,
    Sink,
    SinkStats,
    SlackSink,
    StopTraining,
    StopTrainingSink,
    WebhookSink,
)

__all__ = [
    "AlertConfig",
    "AlertmanagerSink",
    "CallbackSink",
    "Condition",
    "ConsoleSink",
    "Engine",
    "JsonlSink",
    "LoggingSink",
    "Notification",
    "Notifier",
    "OnlineAlerts",
    "Rule",
    "RuleError",
    "RuleSet",
    "RuleState",
    "RuleStatus",
    "RunFollower",
    "SEVERITIES",
    "Settings",
    "Sink",
    "SinkStats",
    "SlackSink",
    "State",
    "StopTraining",
    "StopTrainingSink",
    "Transition",
    "WebhookSink",
    "advance",
    "default_rules",
    "fingerprint",
    "initial_state",
    "load_rules",
    "make_online_alerts",
    "online_from_arg",
    "parse_rules",
    "read_history",
    "run_label",
]
