-- Read models of the agent hub, rebuilt from the log on request (actors/projections.py).
CREATE TABLE proj_agents (
    agent_id   text PRIMARY KEY,
    name       text NOT NULL,
    settings   jsonb NOT NULL,
    status     text NOT NULL,
    restarts   int NOT NULL DEFAULT 0,
    last_error text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE proj_chat_messages (
    position         bigint PRIMARY KEY,
    agent_id         text NOT NULL,
    chat_id          text NOT NULL,
    role             text NOT NULL,
    text             text NOT NULL,
    platform_user_id text,
    channel          text,
    at               timestamptz NOT NULL
);
CREATE INDEX proj_chat_messages_chat ON proj_chat_messages (agent_id, chat_id, position);

CREATE TABLE proj_token_usage (
    agent_id          text NOT NULL,
    provider          text NOT NULL,
    model             text NOT NULL,
    calls             bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    total_tokens      bigint NOT NULL,
    cost_usd          double precision NOT NULL,
    PRIMARY KEY (agent_id, provider, model)
);

-- Liveness telemetry written by the agent runners; not events (see docs/architecture.md).
CREATE TABLE agent_heartbeats (
    agent_id     text PRIMARY KEY,
    at           timestamptz NOT NULL,
    pid          int NOT NULL,
    active_chats int NOT NULL,
    handled      bigint NOT NULL
);
