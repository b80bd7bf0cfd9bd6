# cmake -DNPM=... -DSRC=... -DDIR=... -DSTAMP=... -DCHECK="file|file" -P npm_ci.cmake
# Installs the packages pinned by SRC/package-lock.json (integrity hashes checked by npm)
# into DIR/node_modules, then touches STAMP. A failure names the command that fixes it.
file(MAKE_DIRECTORY "${DIR}")
configure_file("${SRC}/package.json" "${DIR}/package.json" COPYONLY)
configure_file("${SRC}/package-lock.json" "${DIR}/package-lock.json" COPYONLY)
execute_process(COMMAND "${NPM}" ci --ignore-scripts --no-audit --no-fund --loglevel=error
                WORKING_DIRECTORY "${DIR}" RESULT_VARIABLE rc OUTPUT_VARIABLE out
                ERROR_VARIABLE out)
string(REPLACE "|" ";" CHECK "${CHECK}")
foreach(f ${CHECK})
  if(NOT EXISTS "${DIR}/${f}")
    set(rc "${rc}; ${f} missing")
  endif()
endforeach()
if(NOT rc STREQUAL "0")
  message(FATAL_ERROR "the dashboard's chart library could not be installed from the npm "
          "registry (npm ci in ${DIR}: ${rc})\n${out}\n"
          "Fix: reach the npm registry and run `npm ci --prefix ${DIR}` "
          "(or `scripts/deps`, which installs npm), then build again.")
endif()
file(TOUCH "${STAMP}")
