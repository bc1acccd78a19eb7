//! The schema, written by hand for both backends (`diesel print-schema` on SQLite would say
//! `Integer` for rowids). Keep in step with `migrations/{postgres,sqlite}`.

diesel::table! {
    users (id) {
        id -> BigInt,
        name -> Text,
        enabled -> Bool,
        balance_nanousd -> Nullable<BigInt>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    api_keys (id) {
        id -> BigInt,
        user_id -> BigInt,
        key_hash -> Text,
        key_prefix -> Text,
        label -> Nullable<Text>,
        quota_nanousd -> Nullable<BigInt>,
        spent_nanousd -> BigInt,
        max_sessions -> Nullable<Integer>,
        max_concurrent_turns -> Nullable<Integer>,
        created_at -> Timestamp,
        revoked_at -> Nullable<Timestamp>,
        allowed_models -> Nullable<Text>,
        allowed_service_tiers -> Nullable<Text>,
    }
}

diesel::table! {
    usage_logs (id) {
        id -> BigInt,
        request_id -> Text,
        api_key_id -> BigInt,
        user_id -> BigInt,
        session_id -> Text,
        turn_index -> Integer,
        account -> Text,
        model -> Text,
        status -> Text,
        usage_source -> Text,
        warmup -> Bool,
        input_tokens -> BigInt,
        cached_input_tokens -> BigInt,
        cache_write_tokens -> BigInt,
        output_tokens -> BigInt,
        reasoning_tokens -> BigInt,
        total_tokens -> BigInt,
        cost_nanousd -> BigInt,
        upstream_wait_ms -> Nullable<BigInt>,
        first_event_ms -> Nullable<BigInt>,
        first_token_ms -> Nullable<BigInt>,
        duration_ms -> BigInt,
        error_code -> Nullable<Text>,
        accepted_at -> Timestamp,
        created_at -> Timestamp,
        response_id -> Nullable<Text>,
        origin -> Text,
        transport -> Text,
        upstream_transport -> Text,
        service_tier -> Text,
        cache_write_30m_tokens -> BigInt,
        cache_write_12h_tokens -> BigInt,
    }
}

diesel::table! {
    usage_quarantine (id) {
        id -> BigInt,
        request_id -> Text,
        api_key_id -> BigInt,
        payload -> Text,
        reason -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    billing_ledger (id) {
        id -> BigInt,
        request_id -> Text,
        api_key_id -> BigInt,
        user_id -> BigInt,
        amount_nanousd -> BigInt,
        created_at -> Timestamp,
    }
}

diesel::table! {
    billing_compensations (id) {
        id -> BigInt,
        request_id -> Text,
        api_key_id -> BigInt,
        user_id -> BigInt,
        amount_nanousd -> BigInt,
        status -> Text,
        attempts -> Integer,
        next_attempt_at -> Nullable<Timestamp>,
        last_error -> Nullable<Text>,
        error_history -> Text,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        settled_at -> Nullable<Timestamp>,
        dead_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    response_bindings (response_id) {
        response_id -> Text,
        account -> Text,
        api_key_id -> BigInt,
        created_at -> Timestamp,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    account_facts (account) {
        account -> Text,
        http_only -> Bool,
        lanes_refused -> Bool,
        refused_frame_bytes -> BigInt,
        learnt_at -> Timestamp,
    }
}

diesel::table! {
    account_affinity (api_key_id, affinity_key) {
        api_key_id -> BigInt,
        affinity_key -> Text,
        account -> Text,
        updated_at -> Timestamp,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    fleet_slots (slot_id) {
        slot_id -> Text,
        api_key_id -> BigInt,
        kind -> Text,
        relay_id -> Text,
        created_at -> Timestamp,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    turn_reservations (request_id, api_key_id) {
        request_id -> Text,
        api_key_id -> BigInt,
        user_id -> BigInt,
        amount_nanousd -> BigInt,
        created_at -> Timestamp,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    /// Daily rollups of `usage_logs`, kept by a trigger (docs/DESIGN.md#retention).
    usage_daily (day, api_key_id, model) {
        day -> Date,
        api_key_id -> BigInt,
        model -> Text,
        turns -> BigInt,
        input_tokens -> BigInt,
        cached_input_tokens -> BigInt,
        cache_write_tokens -> BigInt,
        output_tokens -> BigInt,
        reasoning_tokens -> BigInt,
        cost_nanousd -> BigInt,
    }
}

diesel::table! {
    /// Operator actions (docs/DESIGN.md#audit).
    admin_audit (id) {
        id -> BigInt,
        at -> Timestamp,
        actor -> Text,
        peer -> Text,
        action -> Text,
        target -> Text,
        detail -> Text,
    }
}

diesel::table! {
    /// A view: the compensation backlog by status.
    billing_compensation_backlog (status) {
        status -> Text,
        rows_count -> BigInt,
        amount_nanousd -> BigInt,
        oldest_created_at -> Nullable<Timestamp>,
        oldest_age_s -> BigInt,
        max_attempts -> Nullable<Integer>,
    }
}

diesel::joinable!(api_keys -> users (user_id));
diesel::joinable!(usage_logs -> api_keys (api_key_id));
diesel::joinable!(billing_ledger -> api_keys (api_key_id));
diesel::joinable!(billing_compensations -> api_keys (api_key_id));

diesel::allow_tables_to_appear_in_same_query!(
    admin_audit,
    usage_daily,
    users,
    api_keys,
    usage_logs,
    billing_ledger,
    billing_compensations,
    response_bindings,
    turn_reservations,
    account_affinity,
    account_facts,
    fleet_slots,
);
