//! Liveness of the database itself.

use diesel::sql_types::Integer;
use diesel::{QueryableByName, sql_query};
use diesel_async::RunQueryDsl;

use crate::db::{DbError, DbPool};

#[derive(QueryableByName)]
struct One {
    #[diesel(sql_type = Integer)]
    one: i32,
}

/// A round trip to the database (`SELECT 1`).
pub async fn ping(pool: &DbPool) -> Result<(), DbError> {
    let row: One = with_conn!(pool, |c| sql_query("SELECT 1 AS one").get_result(c).await?);
    debug_assert_eq!(row.one, 1);
    Ok(())
}
