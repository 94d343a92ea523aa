-- Team replay and fork read every event of one run (actors/agents/team/history.py). Matching stream names with
-- LIKE and run ids inside data, that query scanned the whole log: 50-60 ms at 300,000 events, growing with it.
-- Every team event names its run in data.run_id, so this index finds the streams a run touched; their events
-- are then read through the (stream, version) index. Only events with a run id are indexed (team events and the
-- team's completions; a hub completion's run_id is null): the hub's chat traffic pays nothing for it.
CREATE INDEX events_run ON events ((data->>'run_id')) WHERE data->>'run_id' IS NOT NULL;
