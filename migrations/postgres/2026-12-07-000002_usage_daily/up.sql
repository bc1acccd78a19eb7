-- Daily rollups per key and model (docs/DESIGN.md#retention): kept by the database itself on
-- every usage row inserted, whoever inserts it, so they hold what `usage purge` removes.
CREATE TABLE usage_daily (
    day                  DATE NOT NULL,
    api_key_id           BIGINT NOT NULL,
    model                TEXT NOT NULL,
    turns                BIGINT NOT NULL,
    input_tokens         BIGINT NOT NULL,
    cached_input_tokens  BIGINT NOT NULL,
    cache_write_tokens   BIGINT NOT NULL,
    output_tokens        BIGINT NOT NULL,
    reasoning_tokens     BIGINT NOT NULL,
    cost_nanousd         BIGINT NOT NULL,
    PRIMARY KEY (day, api_key_id, model)
);
COMMENT ON TABLE usage_daily IS 'Per UTC day (of accepted_at), key and model: turns, tokens and cost of usage_logs, added by a trigger on every insert; never reduced by a purge of usage_logs. Cache hit rate = cached_input_tokens / input_tokens.';

-- One statement-level trigger per insert batch: the batch's rows summed per (day, key, model)
-- and added in key order, so two relays' batches lock rollup rows in the same order (no
-- deadlock between them).
CREATE FUNCTION usage_daily_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_daily AS d (day, api_key_id, model, turns, input_tokens,
        cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_nanousd)
    SELECT accepted_at::date, api_key_id, model, count(*), sum(input_tokens)::bigint,
        sum(cached_input_tokens)::bigint, sum(cache_write_tokens)::bigint,
        sum(output_tokens)::bigint, sum(reasoning_tokens)::bigint, sum(cost_nanousd)::bigint
    FROM new_rows
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (day, api_key_id, model) DO UPDATE SET
        turns = d.turns + EXCLUDED.turns,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        cache_write_tokens = d.cache_write_tokens + EXCLUDED.cache_write_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        reasoning_tokens = d.reasoning_tokens + EXCLUDED.reasoning_tokens,
        cost_nanousd = d.cost_nanousd + EXCLUDED.cost_nanousd;
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_daily_after_insert AFTER INSERT ON usage_logs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_daily_add();

-- The rows written before this migration.
INSERT INTO usage_daily (day, api_key_id, model, turns, input_tokens, cached_input_tokens,
    cache_write_tokens, output_tokens, reasoning_tokens, cost_nanousd)
SELECT accepted_at::date, api_key_id, model, count(*), sum(input_tokens)::bigint,
    sum(cached_input_tokens)::bigint, sum(cache_write_tokens)::bigint, sum(output_tokens)::bigint,
    sum(reasoning_tokens)::bigint, sum(cost_nanousd)::bigint
FROM usage_logs
GROUP BY 1, 2, 3;
