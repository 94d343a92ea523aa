-- Budgets sum the cost of a run's or an agent's completions (actors/llm/budget.py): partial expression indexes
-- keep that a lookup instead of a scan of every llm.completed event as the log grows.
CREATE INDEX events_llm_run ON events ((data->>'run_id')) WHERE type = 'llm.completed';
CREATE INDEX events_llm_agent ON events ((data->>'agent_id')) WHERE type = 'llm.completed';
