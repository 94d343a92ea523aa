-- Read models of the role-agent team (seed 004), projected by the projector from task/run/decision/memory events.
CREATE TABLE team_runs (
    run_id      text PRIMARY KEY,
    goal        text NOT NULL,
    status      text NOT NULL,
    forked_from text,
    budget_usd  double precision,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE team_tasks (
    task_id    text PRIMARY KEY,
    run_id     text NOT NULL,
    title      text NOT NULL,
    kind       text NOT NULL,
    role       text NOT NULL,
    owner      text NOT NULL,
    priority   int NOT NULL,
    status     text NOT NULL,
    attempts   int NOT NULL DEFAULT 0,
    result     text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX team_tasks_run ON team_tasks (run_id, status);
CREATE INDEX team_tasks_status ON team_tasks (status, priority);

-- The seed's three tables: agent memory, activity log and decision history.
CREATE TABLE team_memory (
    position bigint PRIMARY KEY,
    role     text NOT NULL,
    run_id   text NOT NULL,
    key      text NOT NULL,
    content  text NOT NULL,
    at       timestamptz NOT NULL
);
CREATE INDEX team_memory_role ON team_memory (role, position);

CREATE TABLE team_activity (
    position bigint PRIMARY KEY,
    role     text NOT NULL,
    run_id   text NOT NULL,
    task_id  text,
    type     text NOT NULL,
    summary  text NOT NULL,
    at       timestamptz NOT NULL
);
CREATE INDEX team_activity_role ON team_activity (role, position);

CREATE TABLE team_decisions (
    decision_id text PRIMARY KEY,
    run_id      text NOT NULL,
    question    text NOT NULL,
    decision    text,
    rationale   text,
    votes       jsonb NOT NULL DEFAULT '{}',
    verdicts    jsonb NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL
);

CREATE TABLE team_usage (
    run_id            text NOT NULL,
    role              text NOT NULL,
    provider          text NOT NULL,
    model             text NOT NULL,
    calls             bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cost_usd          double precision NOT NULL,
    PRIMARY KEY (run_id, role, provider, model)
);
