-- A group-commit batch notifies inside its own transaction (storage/group_commit.py). The NOTIFY is delivered at
-- the commit itself, not one round trip after it, and the writing process sends no separate statement.
-- The notify lock still serialises notifying commits, but there are only a few of them at a time (one batch
-- in flight per process and slot), not one per writer as when migration 0004 moved NOTIFY out of the append.
CREATE FUNCTION agenthub_append_batch_notify(
    p_streams text[], p_modes text[], p_expected bigint[], p_idem_keys text[],
    p_offsets int[], p_counts int[],
    p_ids uuid[], p_types text[], p_data jsonb[], p_meta jsonb[]
) RETURNS TABLE (out_item int, out_position bigint, out_version bigint, out_replayed boolean, out_actual bigint)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM agenthub_append_batch(
        p_streams, p_modes, p_expected, p_idem_keys, p_offsets, p_counts, p_ids, p_types, p_data, p_meta);
    PERFORM pg_notify('agenthub_events', '');
END $$;
